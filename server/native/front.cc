// remoteloss_server._front: gRPC's C++ server as the transport in front of the Python server.
//
// Python's grpc.aio costs a request about four times the CPU the same call costs in gRPC's C++
// core (bench/server_cpu.py: its "echo" and "echo-c++" rows): its Cython layer, an event-loop
// turn and a thread hand-off for every call. This module keeps the transport in C++ and hands
// Python what arrived in batches: one eventfd wake-up and one take() for every call and
// message that came in meanwhile. remoteloss_server.native_front runs the server's own Python
// handlers (and interceptors) on them, so every method, limit and status stays the one the
// grpc.aio server has.
//
// One asynchronous generic service; every method is a stream of messages to gRPC's C++ core, and
// Python decides from the method's handler how many it reads. Events, from take():
//   (START, id, method, metadata, deadline, peer, first message or None)
//   (MESSAGE, id, bytes)      a message asked for by read(id)
//   (HALF_CLOSE, id)          the caller sends no more (the answer to read(id) when none comes)
//   (WRITTEN, id)             write(id, ...) has been taken by gRPC
//   (DONE, id, cancelled)     the call is over: finished, or cancelled (deadline, client, GOAWAY)
// deadline: seconds since the epoch (time.time()), or None.
// Calls from Python: read(id), write(id, bytes), finish(id, code, details, trailing, bytes|None),
// each at most once outstanding per kind (read, write/finish), as gRPC's async API requires.
// A call's id is dropped after DONE and its last operation; calls on a dropped id do nothing.
// Connections come from listening sockets the Python side bound (Acceptor), so that they can be
// counted: gRPC's core (1.51) has no bound on them.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/alarm.h>
#include <grpcpp/resource_quota.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

enum Kind { kStart = 0, kMessage = 1, kHalfClose = 2, kWritten = 3, kDone = 4 };
enum Op { kAsk, kRead, kWrite, kFinish, kNotify };

struct Event {
  Kind kind;
  uint64_t id;
  grpc::ByteBuffer message;
  bool has_message = false;
  bool cancelled = false;
  // kStart only
  std::string method, peer;
  std::vector<std::pair<std::string, std::string>> metadata;
  double deadline = -1;
};

class Front;

struct Call;
struct Tag {
  Call* call;
  Op op;
};

struct Call {
  Call(Front* front, uint64_t id) : front(front), id(id), stream(&context) {}
  Front* front;
  uint64_t id;
  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer in, out;
  Tag tags[5] = {{this, kAsk}, {this, kRead}, {this, kWrite}, {this, kFinish}, {this, kNotify}};
  int pending = 0;  // operations started and not yet back from the queue (under Front::mutex_)
  bool started = false, done = false, finishing = false;
  uint64_t start_taken = ~uint64_t(0);  // Front::taken_ when START was queued; START's place in the queue
  size_t start_index = 0;
};

// Accepts connections on listening sockets the Python side bound, at most ``max`` open at once (one
// more is closed at once), and hands each to gRPC's server. gRPC's core (1.51) has no bound of its
// own. A connection gRPC has closed is noticed lazily: only at the bound are the descriptors
// handed over checked again (gone, or now another file: closed), at most every 20 ms.
class Acceptor {
 public:
  Acceptor(std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> to, std::vector<int> listeners, int max)
      : to_(std::move(to)), listeners_(std::move(listeners)), max_(max) {}

  bool Start() {
    for (int listener : listeners_) {  // accept4 until EAGAIN: the listeners must not block
      int flags = fcntl(listener, F_GETFL);
      if (flags < 0 || fcntl(listener, F_SETFL, flags | O_NONBLOCK) != 0) return false;
    }
    if (pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) return false;
    thread_ = std::thread([this] { Run(); });
    return true;
  }

  void Stop() {
    if (!thread_.joinable()) return;
    char byte = 0;
    ssize_t ignored = write(wake_[1], &byte, 1);
    (void)ignored;
    thread_.join();
    close(wake_[0]);
    close(wake_[1]);
  }

 private:
  void Run() {
    std::vector<pollfd> polled;
    for (int listener : listeners_) polled.push_back({listener, POLLIN, 0});
    polled.push_back({wake_[0], POLLIN, 0});
    while (true) {
      if (poll(polled.data(), polled.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (polled.back().revents != 0) return;  // Stop()
      for (size_t i = 0; i + 1 < polled.size(); ++i) {
        if (polled[i].revents != 0) AcceptAll(polled[i].fd);
      }
    }
  }

  void AcceptAll(int listener) {
    while (true) {
      int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE) {  // out of descriptors: wait, do not spin
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        return;
      }
      Admit(listener, fd);
    }
  }

  void Admit(int listener, int fd) {
    if (open_.size() >= size_t(max_)) Recount();
    struct stat st;
    if (open_.size() >= size_t(max_) || fstat(fd, &st) != 0) {
      close(fd);
      return;
    }
    open_[fd] = st.st_ino;  // a descriptor gRPC closed and the kernel gave again is replaced
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    grpc::experimental::ExternalConnectionAcceptor::NewConnectionParameters connection;
    connection.listener_fd = listener;
    connection.fd = fd;
    to_->HandleNewConnection(&connection);
  }

  void Recount() {
    auto now = std::chrono::steady_clock::now();
    if (now - recounted_ < std::chrono::milliseconds(20)) return;
    recounted_ = now;
    for (auto it = open_.begin(); it != open_.end();) {
      struct stat st;
      bool same = fstat(it->first, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == it->second;
      it = same ? std::next(it) : open_.erase(it);
    }
  }

  std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> to_;
  std::vector<int> listeners_;
  const int max_;
  int wake_[2] = {-1, -1};
  std::thread thread_;
  std::unordered_map<int, ino_t> open_;  // descriptor -> its socket's inode, as handed to gRPC
  std::chrono::steady_clock::time_point recounted_;
};

class Front {
 public:
  Front() : events_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~Front() { close(events_fd_); }

  // Serve the connections accepted on ``listeners`` (bound and listening), at most ``max_connections``.
  bool Start(grpc::ServerBuilder& builder, std::vector<int> listeners, int max_connections, int threads) {
    auto type = grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD;
    auto to = builder.experimental().AddExternalConnectionAcceptor(type, grpc::InsecureServerCredentials());
    builder.RegisterAsyncGenericService(&service_);
    for (int i = 0; i < threads; ++i) queues_.push_back(builder.AddCompletionQueue());
    server_ = builder.BuildAndStart();
    if (!server_) return false;
    for (auto& queue : queues_) {
      for (int i = 0; i < kAsked; ++i) Ask(queue.get());
      threads_.emplace_back([this, q = queue.get()] { Poll(q); });
    }
    acceptor_ = std::make_unique<Acceptor>(std::move(to), std::move(listeners), max_connections);
    return acceptor_->Start();
  }

  int fd() const { return events_fd_; }

  std::vector<Event> Take() {
    uint64_t count;
    ssize_t ignored = read(events_fd_, &count, sizeof count);
    (void)ignored;
    std::vector<Event> taken;
    std::lock_guard<std::mutex> lock(mutex_);
    taken.swap(events_);
    ++taken_;
    return taken;
  }

  // False for an id that is gone (the call is over).
  bool Read(uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    Call* call = Find(id);
    if (call == nullptr || call->done) return false;
    ++call->pending;
    call->stream.Read(&call->in, &call->tags[kRead]);
    return true;
  }

  // Write and Finish are sent by the queue's thread, which gRPC's core then does the socket's work
  // on (not the caller's, Python's event loop): posted, and the thread woken by an alarm.
  void Write(uint64_t id, grpc::ByteBuffer* message) { Post(id, false, grpc::Status::OK, {}, message); }

  void Finish(uint64_t id, const grpc::Status& status, std::vector<std::pair<std::string, std::string>> trailing,
              grpc::ByteBuffer* message) {
    Post(id, true, status, std::move(trailing), message);
  }

  // No new calls; those under way get until the deadline, then are cancelled. Blocks.
  void Shutdown(double grace_s) {
    if (server_ == nullptr) return;
    if (acceptor_ != nullptr) acceptor_->Stop();  // no new connection from here on
    auto deadline = std::chrono::system_clock::now() + std::chrono::microseconds(int64_t(grace_s * 1e6));
    server_->Shutdown(deadline);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closing_ = true;  // no alarm is set on a queue shut down
    }
    for (auto& queue : queues_) queue->Shutdown();
    for (auto& thread : threads_) thread.join();
    threads_.clear();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [id, call] : calls_) delete call;
    calls_.clear();
    server_.reset();
  }

 private:
  static constexpr int kAsked = 32;  // calls asked for at once on each queue: arrivals need not wait

  struct Outgoing {
    uint64_t id;
    bool finish;
    grpc::Status status;
    std::vector<std::pair<std::string, std::string>> trailing;
    grpc::ByteBuffer message;
    bool has_message;
  };

  void Post(uint64_t id, bool finish, const grpc::Status& status,
            std::vector<std::pair<std::string, std::string>> trailing, grpc::ByteBuffer* message) {
    Outgoing out{id, finish, status, std::move(trailing), grpc::ByteBuffer(), message != nullptr};
    if (message != nullptr) out.message.Swap(message);
    std::unique_lock<std::mutex> lock(mutex_);
    if (live_ <= 1 && outbox_.empty()) {  // one call alone: its answer now, as the alarm takes a while
      lock.unlock();
      Start(out);
      return;
    }
    outbox_.push_back(std::move(out));
    if (!armed_ && !closing_) {
      armed_ = true;
      alarm_.Set(queues_[0].get(), gpr_now(GPR_CLOCK_MONOTONIC), &wake_);
    }
  }

  // The posted writes and finishes, in order: each started outside the lock (gRPC may write to the
  // socket inline), its call kept alive meanwhile by its count of pending operations.
  void Send() {
    std::vector<Outgoing> outbox;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      outbox.swap(outbox_);
      armed_ = false;
    }
    for (Outgoing& out : outbox) Start(out);
  }

  void Start(Outgoing& out) {
    Call* call;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      call = Find(out.id);
      if (call == nullptr || call->finishing || (!out.finish && call->done)) return;
      call->finishing = out.finish;
      ++call->pending;
    }
    if (!out.finish) {
      call->out.Swap(&out.message);
      call->stream.Write(call->out, &call->tags[kWrite]);
      return;
    }
    for (const auto& [key, value] : out.trailing) call->context.AddTrailingMetadata(key, value);
    if (out.has_message && out.status.ok()) {
      call->out.Swap(&out.message);
      call->stream.WriteAndFinish(call->out, grpc::WriteOptions(), out.status, &call->tags[kFinish]);
    } else {
      call->stream.Finish(out.status, &call->tags[kFinish]);
    }
  }

  void Ask(grpc::ServerCompletionQueue* queue) {
    std::lock_guard<std::mutex> lock(mutex_);
    Call* call = new Call(this, next_id_++);
    call->context.AsyncNotifyWhenDone(&call->tags[kNotify]);
    call->pending = 2;  // the ask, the notification
    calls_.emplace(call->id, call);
    service_.RequestCall(&call->context, &call->stream, queue, queue, &call->tags[kAsk]);
  }

  void Poll(grpc::ServerCompletionQueue* queue) {
    void* raw;
    bool ok;
    while (queue->Next(&raw, &ok)) {
      Tag* tag = static_cast<Tag*>(raw);
      Call* call = tag->call;
      if (call == nullptr) {  // the alarm: writes and finishes were posted
        Send();
        continue;
      }
      switch (tag->op) {
        case kAsk:
          if (ok) {
            Ask(queue);
            Event event{};
            event.kind = kStart;
            event.id = call->id;
            Describe(call, &event);
            {
              std::lock_guard<std::mutex> lock(mutex_);
              call->started = true;
              ++live_;
              ++call->pending;  // the first read, started below
            }
            Push(std::move(event), call);  // before the read: its MESSAGE must not come first
            std::lock_guard<std::mutex> lock(mutex_);
            call->stream.Read(&call->in, &call->tags[kRead]);
          }
          break;
        case kRead: {
          if (ok && Attach(call)) break;
          Event event{};
          event.kind = ok ? kMessage : kHalfClose;
          event.id = call->id;
          if (ok) {
            event.message.Swap(&call->in);
            event.has_message = true;
          }
          Push(std::move(event));
          break;
        }
        case kWrite: {
          Event event{};
          event.kind = kWritten;
          event.id = call->id;
          Push(std::move(event));
          break;
        }
        case kFinish:
          break;
        case kNotify: {
          Event event{};
          event.kind = kDone;
          event.id = call->id;
          event.cancelled = call->context.IsCancelled();
          {
            std::lock_guard<std::mutex> lock(mutex_);
            call->done = true;
            if (call->started) --live_;
          }
          if (call->started) Push(std::move(event));
          break;
        }
      }
      Settle(call);
    }
  }

  static void Describe(Call* call, Event* event) {
    grpc::GenericServerContext& context = call->context;
    event->method = context.method();
    event->peer = context.peer();
    for (const auto& [key, value] : context.client_metadata()) {
      event->metadata.emplace_back(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
    }
    auto deadline = context.deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      event->deadline = std::chrono::duration<double>(deadline.time_since_epoch()).count();
    }
  }

  // One operation of ``call`` is back: the call goes once it is over and nothing is under way.
  void Settle(Call* call) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--call->pending == 0 && call->done) {
      calls_.erase(call->id);
      delete call;
    }
  }

  // The first message joins its call's START while Python has not taken it: a small request is
  // one event, and a call is still announced at its headers (a refusal need not wait for its body).
  bool Attach(Call* call) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (call->start_taken == taken_ && call->start_index < events_.size()) {
      Event& start = events_[call->start_index];
      if (start.id == call->id && start.kind == kStart && !start.has_message) {
        start.message.Swap(&call->in);
        start.has_message = true;
        call->start_taken = ~uint64_t(0);
        return true;
      }
    }
    return false;
  }

  void Push(Event&& event, Call* start = nullptr) {
    bool first;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      first = events_.empty();
      if (start != nullptr) {
        start->start_index = events_.size();
        start->start_taken = taken_;
      }
      events_.push_back(std::move(event));
    }
    if (first) {
      uint64_t one = 1;
      ssize_t ignored = write(events_fd_, &one, sizeof one);
      (void)ignored;
    }
  }

  Call* Find(uint64_t id) {
    auto found = calls_.find(id);
    return found == calls_.end() ? nullptr : found->second;
  }

  const int events_fd_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Acceptor> acceptor_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::unordered_map<uint64_t, Call*> calls_;
  std::vector<Event> events_;
  std::vector<Outgoing> outbox_;
  grpc::Alarm alarm_;
  Tag wake_{nullptr, kAsk};
  bool armed_ = false, closing_ = false;
  int live_ = 0;  // calls started and not over
  uint64_t taken_ = 0;  // how many times Python has taken the events
  uint64_t next_id_ = 1;
};

// ---- Python ----------------------------------------------------------------------------------

constexpr Py_ssize_t kReleaseGil = 1 << 20;  // copies past this size run without the GIL

struct PyFront {
  PyObject_HEAD
  Front* front;
};

PyObject* ToBytes(grpc::ByteBuffer* buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer->Dump(&slices).ok()) return PyBytes_FromStringAndSize(nullptr, 0);
  Py_ssize_t size = 0;
  for (const auto& slice : slices) size += slice.size();
  PyObject* bytes = PyBytes_FromStringAndSize(nullptr, size);
  if (bytes == nullptr) return nullptr;
  char* to = PyBytes_AS_STRING(bytes);
  auto copy = [&] {
    for (const auto& slice : slices) {
      std::memcpy(to, slice.begin(), slice.size());
      to += slice.size();
    }
  };
  if (size > kReleaseGil) {
    Py_BEGIN_ALLOW_THREADS copy();
    Py_END_ALLOW_THREADS
  } else {
    copy();
  }
  return bytes;
}

// A buffer's bytes as gRPC's message (one copy). False with a Python error set.
bool ToBuffer(PyObject* object, grpc::ByteBuffer* buffer) {
  Py_buffer view;
  if (PyObject_GetBuffer(object, &view, PyBUF_SIMPLE) != 0) return false;
  if (view.len > kReleaseGil) {
    Py_BEGIN_ALLOW_THREADS grpc::Slice slice(view.buf, view.len);
    grpc::ByteBuffer(&slice, 1).Swap(buffer);
    Py_END_ALLOW_THREADS
  } else {
    grpc::Slice slice(view.buf, view.len);
    grpc::ByteBuffer(&slice, 1).Swap(buffer);
  }
  PyBuffer_Release(&view);
  return true;
}

PyObject* Text(const std::string& text) {
  PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), text.size(), nullptr);
  if (decoded == nullptr) {
    PyErr_Clear();
    decoded = PyUnicode_DecodeLatin1(text.data(), text.size(), nullptr);
  }
  return decoded;
}

// Metadata as grpc.aio gives it: (key, str) pairs, bytes for the keys ending "-bin".
PyObject* Metadata(const std::vector<std::pair<std::string, std::string>>& pairs) {
  PyObject* tuple = PyTuple_New(pairs.size());
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const auto& [key, value] = pairs[i];
    bool binary = key.size() >= 4 && key.compare(key.size() - 4, 4, "-bin") == 0;
    PyObject* pair = Py_BuildValue("(s#N)", key.data(), Py_ssize_t(key.size()),
                                   binary ? PyBytes_FromStringAndSize(value.data(), value.size()) : Text(value));
    if (pair == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, i, pair);
  }
  return tuple;
}

PyObject* EventTuple(Event& event) {
  PyObject* message = nullptr;
  if (event.has_message) {
    message = ToBytes(&event.message);
    if (message == nullptr) return nullptr;
  } else {
    message = Py_NewRef(Py_None);
  }
  unsigned long long id = event.id;
  switch (event.kind) {
    case kStart: {
      PyObject* deadline = event.deadline < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(event.deadline);
      return Py_BuildValue("(iKNNNNN)", int(kStart), id, Text(event.method), Metadata(event.metadata), deadline,
                           Text(event.peer), message);
    }
    case kMessage:
      return Py_BuildValue("(iKN)", int(kMessage), id, message);
    case kDone:
      Py_DECREF(message);
      return Py_BuildValue("(iKO)", int(kDone), id, event.cancelled ? Py_True : Py_False);
    default:
      Py_DECREF(message);
      return Py_BuildValue("(iK)", int(event.kind), id);
  }
}

bool Pairs(PyObject* sequence, std::vector<std::pair<std::string, std::string>>* pairs) {
  PyObject* fast = PySequence_Fast(sequence, "trailing metadata: a sequence of (key, value) pairs");
  if (fast == nullptr) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(fast); ++i) {
    PyObject* pair = PySequence_Fast_GET_ITEM(fast, i);
    PyObject *key, *value;
    if (!PyArg_ParseTuple(pair, "OO", &key, &value)) {
      ok = false;
      break;
    }
    Py_ssize_t key_size, value_size;
    const char* key_data = PyUnicode_AsUTF8AndSize(key, &key_size);
    const char* value_data = nullptr;
    if (key_data != nullptr && PyBytes_Check(value)) {
      value_data = PyBytes_AS_STRING(value);
      value_size = PyBytes_GET_SIZE(value);
    } else if (key_data != nullptr) {
      value_data = PyUnicode_AsUTF8AndSize(value, &value_size);
    }
    if (value_data == nullptr) {
      ok = false;
      break;
    }
    pairs->emplace_back(std::string(key_data, key_size), std::string(value_data, value_size));
  }
  Py_DECREF(fast);
  return ok;
}

int Init(PyFront* self, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"listeners", "options", "max_connections", "threads", "memory_bytes", nullptr};
  PyObject *listening, *options;
  int max_connections, threads = 1;
  long long memory = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOi|iL", const_cast<char**>(names), &listening, &options,
                                   &max_connections, &threads, &memory)) {
    return -1;
  }
  std::vector<int> listeners;
  PyObject* fds = PySequence_Fast(listening, "listeners: a sequence of listening sockets' descriptors");
  if (fds == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fds); ++i) {
    listeners.push_back(int(PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i))));
  }
  Py_DECREF(fds);
  if (PyErr_Occurred()) return -1;
  grpc::ServerBuilder builder;
  PyObject* fast = PySequence_Fast(options, "options: a sequence of (name, int) pairs");
  if (fast == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    const char* name;
    int value;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "si", &name, &value)) {
      Py_DECREF(fast);
      return -1;
    }
    builder.AddChannelArgument(name, value);
  }
  Py_DECREF(fast);
  if (memory > 0) {
    grpc::ResourceQuota quota("remoteloss");
    quota.Resize(size_t(memory));
    builder.SetResourceQuota(quota);
  }
  self->front = new Front();
  bool started;
  Py_BEGIN_ALLOW_THREADS started = self->front->Start(builder, std::move(listeners), max_connections, threads);
  Py_END_ALLOW_THREADS
  if (!started) {
    PyErr_SetString(PyExc_RuntimeError, "gRPC's server did not start");
    return -1;
  }
  return 0;
}

void Dealloc(PyFront* self) {
  if (self->front != nullptr) {
    Py_BEGIN_ALLOW_THREADS self->front->Shutdown(0);
    Py_END_ALLOW_THREADS
    delete self->front;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Fileno(PyFront* self, PyObject*) { return PyLong_FromLong(self->front->fd()); }

PyObject* Take(PyFront* self, PyObject*) {
  std::vector<Event> events = self->front->Take();
  PyObject* list = PyList_New(events.size());
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < events.size(); ++i) {
    PyObject* event = EventTuple(events[i]);
    if (event == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, event);
  }
  return list;
}

PyObject* ReadMethod(PyFront* self, PyObject* arg) {
  uint64_t id = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  bool reading;
  Py_BEGIN_ALLOW_THREADS reading = self->front->Read(id);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(reading);
}

PyObject* WriteMethod(PyFront* self, PyObject* args) {
  unsigned long long id;
  PyObject* data;
  if (!PyArg_ParseTuple(args, "KO", &id, &data)) return nullptr;
  grpc::ByteBuffer buffer;
  if (!ToBuffer(data, &buffer)) return nullptr;
  Py_BEGIN_ALLOW_THREADS self->front->Write(id, &buffer);
  Py_END_ALLOW_THREADS
  Py_RETURN_TRUE;
}

PyObject* FinishMethod(PyFront* self, PyObject* args) {
  unsigned long long id;
  int code;
  const char* details;
  Py_ssize_t details_size;
  PyObject *trailing, *data;
  if (!PyArg_ParseTuple(args, "Kis#OO", &id, &code, &details, &details_size, &trailing, &data)) return nullptr;
  std::vector<std::pair<std::string, std::string>> pairs;
  if (!Pairs(trailing, &pairs)) return nullptr;
  grpc::ByteBuffer buffer;
  bool has_message = data != Py_None;
  if (has_message && !ToBuffer(data, &buffer)) return nullptr;
  grpc::Status status(static_cast<grpc::StatusCode>(code), std::string(details, details_size));
  Py_BEGIN_ALLOW_THREADS self->front->Finish(id, status, std::move(pairs), has_message ? &buffer : nullptr);
  Py_END_ALLOW_THREADS
  Py_RETURN_TRUE;
}

PyObject* ShutdownMethod(PyFront* self, PyObject* arg) {
  double grace = PyFloat_AsDouble(arg);
  if (PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS self->front->Shutdown(grace);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"fileno", reinterpret_cast<PyCFunction>(Fileno), METH_NOARGS, "The eventfd that is readable while events wait."},
    {"take", reinterpret_cast<PyCFunction>(Take), METH_NOARGS, "Every event that has arrived, in order."},
    {"read", reinterpret_cast<PyCFunction>(ReadMethod), METH_O, "read(id): ask for the call's next message."},
    {"write", reinterpret_cast<PyCFunction>(WriteMethod), METH_VARARGS, "write(id, data): send a message."},
    {"finish", reinterpret_cast<PyCFunction>(FinishMethod), METH_VARARGS,
     "finish(id, code, details, trailing, data or None): the last message and the status."},
    {"shutdown", reinterpret_cast<PyCFunction>(ShutdownMethod), METH_O,
     "shutdown(grace_s): no new calls; those under way are cancelled after grace_s. Blocks."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject kFrontType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_front", "gRPC's C++ server in front of the Python server.", -1};

}  // namespace

PyMODINIT_FUNC PyInit__front() {
  kFrontType.tp_name = "remoteloss_server._front.Front";
  kFrontType.tp_basicsize = sizeof(PyFront);
  kFrontType.tp_flags = Py_TPFLAGS_DEFAULT;
  kFrontType.tp_new = PyType_GenericNew;
  kFrontType.tp_init = reinterpret_cast<initproc>(Init);
  kFrontType.tp_dealloc = reinterpret_cast<destructor>(Dealloc);
  kFrontType.tp_methods = kMethods;
  if (PyType_Ready(&kFrontType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  Py_INCREF(&kFrontType);
  PyModule_AddObject(module, "Front", reinterpret_cast<PyObject*>(&kFrontType));
  PyModule_AddIntConstant(module, "START", kStart);
  PyModule_AddIntConstant(module, "MESSAGE", kMessage);
  PyModule_AddIntConstant(module, "HALF_CLOSE", kHalfClose);
  PyModule_AddIntConstant(module, "WRITTEN", kWritten);
  PyModule_AddIntConstant(module, "DONE", kDone);
  return module;
}
