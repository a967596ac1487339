// Internal seam between shim.cpp and nccl.cpp: the NCCL backend lives in its own translation unit
// because its headers need CUDA's, which a machine may lack (then nccl.cpp compiles to a stub).
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

bool cnx_nccl_available();
c10::intrusive_ptr<c10d::Backend> cnx_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                int rank, int world,
                                                std::chrono::milliseconds timeout,
                                                int device_index);
