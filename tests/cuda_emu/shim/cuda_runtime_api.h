// The part of the CUDA runtime API the sources call, for the CPU emulation (runtime.cpp).
#pragma once

#include <cstddef>

// A toolkit new enough for the 32 KB kernel-argument tables (>= 12.1).
#define CUDART_VERSION 12080

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2
};

// 12080: a driver that allows the 32 KB tables (SAM_KERNELS_CUDA_TABLES=small forces 4 KB).
cudaError_t cudaDriverGetVersion(int* version);
// Never capturing: the emulation has no CUDA graphs.
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
