// Per-thread CUDA streams for tilefeat's model workers (see src/device.rs, `use_worker_stream`).
//
// libtorch keeps a current stream per thread; until a thread picks one it is the device's
// default stream, which every model worker then shares, so one worker's upload waits behind
// the other's convolutions. tch has no stream API, hence this shim over c10::cuda. Each
// function catches every exception: none may cross into Rust.

#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace {
void copy_message(const char* what, char* err, std::size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

// Run `f`: 0, or -1 with the exception's message in `err`.
template <typename F>
int guarded(char* err, std::size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
  } catch (...) {
    copy_message("unknown C++ exception", err, err_len);
  }
  return -1;
}
}  // namespace

extern "C" {

// Make a stream from libtorch's pool the calling thread's current stream on `device`.
// Returns 0, or -1 with the reason in `err`.
int tilefeat_use_pool_stream(int device, char* err, std::size_t err_len) {
  return guarded(err, err_len, [&] {
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(
        /*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device)));
  });
}

// The id of the calling thread's current stream on `device` into `id` (0 is the default
// stream). Returns 0, or -1 with the reason in `err`.
int tilefeat_current_stream_id(int device, long long* id, char* err, std::size_t err_len) {
  return guarded(err, err_len, [&] {
    *id = static_cast<long long>(
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).id());
  });
}

}  // extern "C"
