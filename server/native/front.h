// The native front's transport: gRPC's C++ server, its calls as events (front.cc: the Python module).
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
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "acceptor.h"

namespace remoteloss {

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

}  // namespace remoteloss
