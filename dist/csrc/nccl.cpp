// ProcessGroupNCCL construction, compiled with USE_C10D_NCCL only when build.rs found NCCL's and
// CUDA's headers; otherwise asking for NCCL is a clear runtime error.
#include "backends.h"

#include <stdexcept>

#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

bool cnx_nccl_available() {
  return true;
}

c10::intrusive_ptr<c10d::Backend> cnx_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                int rank, int world,
                                                std::chrono::milliseconds timeout,
                                                int device_index) {
  if (device_index >= 0) {
    // NCCL communicators are created lazily on the current device of the first collective;
    // make that this rank's GPU rather than cuda:0 on every rank.
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
  }
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
}

#else

bool cnx_nccl_available() {
  return false;
}

c10::intrusive_ptr<c10d::Backend> cnx_make_nccl(const c10::intrusive_ptr<c10d::Store>&, int, int,
                                                std::chrono::milliseconds, int) {
  throw std::runtime_error(
      "cnx-dist was built without NCCL (nccl.h or CUDA headers were not found at build time)");
}

#endif
