// The C++ half of cnx-dist: creates torch.distributed's own c10d objects (TCPStore, ProcessGroupGloo,
// ProcessGroupNCCL) and runs blocking collectives on tch tensors, behind the C ABI of shim.h.
// Rust never sees a C++ type or exception: everything is caught here and turned into a string.
#include "shim.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "backends.h"
#include "common.h"

namespace {

using cnx::as_tensor;
using cnx::guarded;

bool is_loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

// Which network device Gloo binds, in the order torch.distributed uses: an explicit
// GLOO_SOCKET_IFNAME wins; a loopback master means a single-machine job, so bind loopback (this
// also works on machines whose hostname does not resolve); otherwise the address the hostname
// resolves to (c10d falls back to loopback itself when it does not resolve).
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const std::string& master) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname != nullptr && ifname[0] != '\0') {
    std::stringstream ss(ifname);
    std::string iface;
    while (std::getline(ss, iface, ',')) {
      if (!iface.empty()) {
        devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      }
    }
  }
  if (devices.empty()) {
    devices.push_back(is_loopback(master)
                          ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                          : c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return devices;
}

// Waits for every work even after one failed: the caller's tensors must not be touched again
// while a collective may still write them.
void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  std::string first_error;
  for (auto& w : works) {
    try {
      w->wait();
    } catch (const c10::Error& e) {
      if (first_error.empty()) first_error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      if (first_error.empty()) first_error = e.what();
    }
  }
  if (!first_error.empty()) {
    throw std::runtime_error(first_error);
  }
}

}  // namespace

extern "C" {

int cnx_dist_has_nccl(void) {
  return cnx_nccl_available() ? 1 : 0;
}

void cnx_dist_free_error(char* err) {
  std::free(err);
}

char* cnx_pg_new(int backend, const char* master_addr, uint16_t port, int rank, int world,
                 int64_t timeout_ms, int device_index, int is_server, const char* store_prefix,
                 cnx_pg** out) {
  *out = nullptr;
  return guarded("creating the process group", [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    auto pg = std::make_unique<cnx_pg>();
    pg->kind = backend;
    pg->device_index = device_index;

    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    if (store_prefix != nullptr && store_prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(store_prefix), store);
    }
    pg->store = store;

    if (backend == CNX_BACKEND_GLOO) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices = gloo_devices(master_addr);
      pg->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(pg->store, rank, world, options);
    } else if (backend == CNX_BACKEND_NCCL) {
      pg->backend = cnx_make_nccl(pg->store, rank, world, timeout, device_index);
    } else {
      throw std::invalid_argument("unknown backend " + std::to_string(backend));
    }
    *out = pg.release();
  });
}

void cnx_pg_free(cnx_pg* pg) {
  if (pg == nullptr) return;
  // A failing shutdown must not abort the process from a Rust Drop; the error has nowhere to go.
  char* err = guarded("shutting down", [&] {
    if (pg->kind == CNX_BACKEND_NCCL) {
      // ProcessGroupNCCL's destructor without shutdown() aborts communicators and warns.
      pg->backend->shutdown();
    }
    pg->backend.reset();
    pg->store.reset();
  });
  std::free(err);
  delete pg;
}

char* cnx_pg_broadcast(cnx_pg* pg, void* const* tensors, size_t n, int root) {
  return guarded("broadcast", [&] {
    // One tensor per call: c10d reads several tensors in one call as replicas of one value.
    std::vector<std::vector<at::Tensor>> args(n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    for (size_t i = 0; i < n; ++i) {
      args[i].push_back(as_tensor(tensors[i]));
      works.push_back(pg->backend->broadcast(args[i], opts));
    }
    wait_all(works);
  });
}

char* cnx_pg_allreduce_sum(cnx_pg* pg, void* const* tensors, size_t n) {
  return guarded("all_reduce", [&] {
    std::vector<std::vector<at::Tensor>> args(n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    for (size_t i = 0; i < n; ++i) {
      args[i].push_back(as_tensor(tensors[i]));
      works.push_back(pg->backend->allreduce(args[i], opts));
    }
    wait_all(works);
  });
}

char* cnx_pg_allgather(cnx_pg* pg, void* input, void* const* outputs, size_t world) {
  return guarded("all_gather", [&] {
    std::vector<at::Tensor> in{as_tensor(input)};
    std::vector<std::vector<at::Tensor>> outs(1);
    for (size_t i = 0; i < world; ++i) {
      outs[0].push_back(as_tensor(outputs[i]));
    }
    std::vector<c10::intrusive_ptr<c10d::Work>> works{pg->backend->allgather(outs, in)};
    wait_all(works);
  });
}

char* cnx_pg_barrier(cnx_pg* pg) {
  return guarded("barrier", [&] {
    c10d::BarrierOptions opts;
    if (pg->kind == CNX_BACKEND_NCCL && pg->device_index >= 0) {
      // Without it ProcessGroupNCCL guesses the device from the rank, which is wrong on
      // multi-node jobs where ranks != local ranks.
      opts.device_ids = {pg->device_index};
    }
    std::vector<c10::intrusive_ptr<c10d::Work>> works{pg->backend->barrier(opts)};
    wait_all(works);
  });
}

char* cnx_set_grad(void* param, void* grad) {
  return guarded("setting .grad", [&] { as_tensor(param).mutable_grad() = as_tensor(grad); });
}

char* cnx_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                      void* const* exp_avg_sqs, size_t n, double step, double lr, double beta1,
                      double beta2, double weight_decay, double eps) {
  return guarded("fused AdamW step", [&] {
    if (n == 0) return;
    std::vector<at::Tensor> p, g, m, v;
    p.reserve(n), g.reserve(n), m.reserve(n), v.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      p.push_back(as_tensor(params[i]));
      g.push_back(as_tensor(grads[i]));
      m.push_back(as_tensor(exp_avgs[i]));
      v.push_back(as_tensor(exp_avg_sqs[i]));
    }
    // torch.optim keeps one float32 step tensor per parameter on its device; the kernel reads
    // them (a fill on the device, not an upload). One shared tensor: every parameter here has
    // taken the same steps.
    auto t = at::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(n, t);
    at::NoGradGuard no_grad;
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  });
}

}  // extern "C"
