// Internal seam between the shim's translation units (shim.cpp, sync_bn.cpp): the process-group
// object behind the opaque `cnx_pg` of shim.h, and the exception-to-string guard every C entry
// point runs its body in.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "shim.h"

struct cnx_pg {
  // Declared before the backend so that it is destroyed after it: the backend may still talk to
  // the store while it shuts down.
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int kind = CNX_BACKEND_GLOO;
  int device_index = -1;
};

namespace cnx {

inline char* dup_error(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

// Runs `body`, mapping any exception to an error string. c10::Error's what() carries a C++
// backtrace that means nothing to the Rust caller, so its short form is used.
template <typename F>
char* guarded(const char* what, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup_error(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_error(std::string(what) + ": " + e.what());
  } catch (...) {
    return dup_error(std::string(what) + ": unknown C++ exception");
  }
}

inline at::Tensor& as_tensor(void* p) {
  return *static_cast<at::Tensor*>(p);
}

}  // namespace cnx
