// CUDA caching-allocator statistics (torch.cuda.max_memory_allocated / max_memory_reserved).
// Compiled with the CUDA headers when the build found them (the NCCL build, USE_CUDA); without
// them the function reports that the statistics are unavailable in this build.
#include "shim.h"
#include <stdexcept>
#include "common.h"
#ifdef USE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

extern "C" char* cnx_cuda_memory_stats(int device, int reset_peak, int64_t* out) {
  return cnx::guarded("reading CUDA memory statistics", [&] {
#ifdef USE_CUDA
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
    if (reset_peak) c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
    (void)device, (void)reset_peak, (void)out;
    throw std::runtime_error("this build of cnx has no CUDA headers (see dist/build.rs)");
#endif
  });
}
