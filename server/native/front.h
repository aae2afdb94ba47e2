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
//   (MESSAGE, id, bytes)      a message asked for by read(id, n)
//   (HALF_CLOSE, id)          the caller sends no more (the answer to a read when none comes)
//   (WRITTEN, id)             the call's queue of writes has room again (after a write(id) that
//                             answered False)
//   (DONE, id, cancelled)     the call is over: finished, or cancelled (deadline, client, GOAWAY)
// deadline: seconds since the epoch (time.time()), or None.
// Calls from Python: read(id, n), write(id, bytes), finish(id, code, details, trailing, bytes|None).
// At most one read is outstanding, as gRPC's async API requires. read(id, n) asks for up to n
// messages: the queue's thread starts the next read as each small one (at most kAheadBytes)
// arrives, so a stream's requests come to Python several to a take(), not each after a round
// trip through the event loop; a larger message ends the run, and Python asks again. Python asks
// only once it has taken what came, so what it holds unread is at most n small messages and one
// more of any size (as a single read would hold). Writes queue on their call: gRPC
// takes one at a time, and the queue's thread starts the next when one is done, without Python.
// write() answers False once the queue is full (kQueued messages, or kQueuedBytes), and Python
// then waits for WRITTEN before the next; a finish waits for the queue to empty.
// A call's id is dropped after DONE and its last operation; calls on a dropped id do nothing.
// Connections come from listening sockets the Python side bound (Acceptor), so that they can be
// counted: gRPC's core (1.51) has no bound on them.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
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

// TLS from PEM files that gRPC reads again every ``refresh_s`` seconds (new handshakes use what
// it read last; a pair that does not load leaves the last good one), with client certificates
// required and checked against ``client_ca`` unless it is empty.
inline std::shared_ptr<grpc::ServerCredentials> WatchedTls(const std::string& cert, const std::string& key,
                                                           const std::string& client_ca, unsigned int refresh_s) {
  auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(key, cert, client_ca, refresh_s);
  grpc::experimental::TlsServerCredentialsOptions options(files);
  options.watch_identity_key_cert_pairs();
  if (client_ca.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

struct Outgoing {
  uint64_t id;
  bool finish;
  grpc::Status status;
  std::vector<std::pair<std::string, std::string>> trailing;
  grpc::ByteBuffer message;
  bool has_message;
};

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
  // Reads (under Front::mutex_): one under way, and how many more Python asked for (read(id, n)).
  bool reading = false;
  int ahead = 0;
  // Writes (under Front::mutex_): one under way (or posted), the rest queued behind it; a finish
  // posted meanwhile waits for them. ``waiting``: Python waits for WRITTEN (the queue was full).
  bool writing = false, waiting = false;
  std::deque<grpc::ByteBuffer> queued;
  size_t queued_bytes = 0;
  std::unique_ptr<Outgoing> finish_after;
  uint64_t start_taken = ~uint64_t(0);  // Front::taken_ when START was queued; START's place in the queue
  size_t start_index = 0;
};

class Front {
 public:
  Front() : events_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~Front() { close(events_fd_); }

  // Serve the connections accepted on ``listeners`` (bound and listening), at most ``max_connections``.
  bool Start(grpc::ServerBuilder& builder, std::vector<int> listeners, int max_connections, int threads,
             std::shared_ptr<grpc::ServerCredentials> credentials) {
    auto type = grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD;
    auto to = builder.experimental().AddExternalConnectionAcceptor(type, credentials);
    builder.RegisterAsyncGenericService(&service_);
    for (int i = 0; i < threads; ++i) queues_.push_back(builder.AddCompletionQueue());
    server_ = builder.BuildAndStart();
    if (!server_) return false;
    for (auto& queue : queues_) {
      for (int i = 0; i < kAsked; ++i) Ask(queue.get());
      threads_.emplace_back([this, q = queue.get()] { Poll(q); });
    }
    writer_ = std::thread([this] { Send(); });
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

  // Up to ``n`` (>= 1) messages: a read now, unless one is under way, and the rest as each small
  // one arrives. False for an id that is gone (the call is over).
  bool Read(uint64_t id, int n) {
    std::lock_guard<std::mutex> lock(mutex_);
    Call* call = Find(id);
    if (call == nullptr || call->done) return false;
    call->ahead = n - 1;
    if (!call->reading) StartRead(call);
    return true;
  }

  // Writes and finishes are started by the front's writer thread, on which gRPC's core then does
  // the socket's work (not on Python's event loop): posted, and the thread woken; or, while a
  // queue's thread is handling an event, by that thread once it is done with it; or, for the one
  // call alive in the front (a lone caller's unary call or stream), at once on Python's thread,
  // which a hop to another thread would only delay. A write while one of its call's is under way
  // joins the call's queue, which the queue's thread empties as each is done. False: the queue is
  // full, and Python waits for WRITTEN before its next write.
  bool Write(uint64_t id, grpc::ByteBuffer* message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Call* call = Find(id);
      if (call == nullptr || call->done || call->finishing || call->finish_after) return true;  // DONE ends it
      if (call->writing) {
        call->queued_bytes += message->Length();
        call->queued.emplace_back();
        call->queued.back().Swap(message);
        call->waiting = call->queued.size() >= kQueued || call->queued_bytes > kQueuedBytes;
        return !call->waiting;
      }
      call->writing = true;
    }
    Post(id, false, grpc::Status::OK, {}, message);
    return true;
  }

  void Finish(uint64_t id, const grpc::Status& status, std::vector<std::pair<std::string, std::string>> trailing,
              grpc::ByteBuffer* message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Call* call = Find(id);
      if (call != nullptr && call->writing && !call->finish_after) {  // after the writes queued
        call->finish_after.reset(new Outgoing{id, true, status, std::move(trailing), grpc::ByteBuffer(), false});
        if (message != nullptr) {
          call->finish_after->message.Swap(message);
          call->finish_after->has_message = true;
        }
        return;
      }
    }
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
      closing_ = true;
    }
    posted_.notify_one();
    if (writer_.joinable()) writer_.join();
    for (auto& queue : queues_) queue->Shutdown();
    for (auto& thread : threads_) thread.join();
    threads_.clear();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [id, call] : calls_) delete call;
    calls_.clear();
    server_.reset();
    acceptor_.reset();  // and with it the credentials: a TLS front's file watcher stops here
  }

 private:
  static constexpr int kAsked = 32;  // calls asked for at once on each queue: arrivals need not wait
  // A call's writes queued behind the one under way, at most: beyond either, Python waits. What a
  // stream holds here beyond the budgets' view is bounded by them and one message.
  static constexpr size_t kQueued = 16, kQueuedBytes = 256 * 1024;
  // A message this small lets the next asked-for read start at once (see read(id, n) above).
  static constexpr size_t kAheadBytes = 16 * 1024;

  // Under mutex_.
  void StartRead(Call* call) {
    call->reading = true;
    ++call->pending;
    call->stream.Read(&call->in, &call->tags[kRead]);
  }

  void Post(uint64_t id, bool finish, const grpc::Status& status,
            std::vector<std::pair<std::string, std::string>> trailing, grpc::ByteBuffer* message) {
    Outgoing out{id, finish, status, std::move(trailing), grpc::ByteBuffer(), message != nullptr};
    if (message != nullptr) out.message.Swap(message);
    std::unique_lock<std::mutex> lock(mutex_);
    if (live_ <= 1 && outbox_.empty()) {  // the one call alive: its answer now, no thread hop
      lock.unlock();
      Start(out);
      return;
    }
    outbox_.push_back(std::move(out));
    bool wake = outbox_.size() == 1 && polling_ == 0;  // else a queue's thread, awake, sends it
    lock.unlock();
    if (wake) posted_.notify_one();
  }

  // The writer thread: the posted writes and finishes, in order, each started outside the lock
  // (gRPC may write to the socket inline), its call kept alive meanwhile by its count of pending
  // operations. Until Shutdown, which lets it start the finishes of the calls given a grace.
  void Send() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      posted_.wait(lock, [this] { return !outbox_.empty() || closing_; });
      if (closing_) return;
      std::vector<Outgoing> outbox;
      outbox.swap(outbox_);
      lock.unlock();
      for (Outgoing& out : outbox) Start(out);
      lock.lock();
    }
  }

  void Start(Outgoing& out) {
    Call* call;
    bool over;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      call = Find(out.id);
      if (call == nullptr || call->finishing) return;
      over = !out.finish && call->done;  // no write for a call that is over; what waited for it goes on
      call->finishing = out.finish;
      ++call->pending;
    }
    if (over) {
      Written(call, false);
      Settle(call);
    } else if (!out.finish) {
      call->out.Swap(&out.message);
      call->stream.Write(call->out, &call->tags[kWrite]);
    } else {
      for (const auto& [key, value] : out.trailing) call->context.AddTrailingMetadata(key, value);
      if (out.has_message && out.status.ok()) {
        call->out.Swap(&out.message);
        call->stream.WriteAndFinish(call->out, grpc::WriteOptions(), out.status, &call->tags[kFinish]);
      } else {
        call->stream.Finish(out.status, &call->tags[kFinish]);
      }
    }
  }

  // The call's write under way is over (``ok``: gRPC took it): the next queued write starts, or,
  // with none, the finish that waited for them; Python hears WRITTEN once there is room again.
  void Written(Call* call, bool ok) {
    bool next = false, room = false;
    std::unique_ptr<Outgoing> finish;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!ok || call->done) {
        call->queued.clear();
        call->queued_bytes = 0;
      }
      if (!call->queued.empty()) {
        call->queued_bytes -= call->queued.front().Length();
        call->out.Swap(&call->queued.front());
        call->queued.pop_front();
        ++call->pending;
        next = true;
      } else {
        call->writing = false;
        finish = std::move(call->finish_after);
      }
      room = call->waiting && call->queued.size() < kQueued && call->queued_bytes <= kQueuedBytes;
      if (room) call->waiting = false;
    }
    if (next) call->stream.Write(call->out, &call->tags[kWrite]);
    if (room) {
      Event event{};
      event.kind = kWritten;
      event.id = call->id;
      Push(std::move(event));
    }
    if (finish) Start(*finish);
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
      ++polling_;  // unlocked: a post that misses it wakes the writer, one that sees it is drained below
      Tag* tag = static_cast<Tag*>(raw);
      Call* call = tag->call;
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
            }
            Push(std::move(event), call);  // before the read: its MESSAGE must not come first
            std::lock_guard<std::mutex> lock(mutex_);
            StartRead(call);
          }
          break;
        case kRead: {
          Event event{};
          event.kind = ok ? kMessage : kHalfClose;
          event.id = call->id;
          size_t size = 0;
          if (ok) {
            size = call->in.Length();
            event.message.Swap(&call->in);
            event.has_message = true;
          }
          {
            // Before Python can see the message: a read(id, n) once it is taken finds this read over.
            std::lock_guard<std::mutex> lock(mutex_);
            call->reading = false;
            if (ok && call->ahead > 0 && size <= kAheadBytes && !call->done) {
              --call->ahead;
              StartRead(call);  // back on this thread (one per queue) only after this message is pushed
            } else {
              call->ahead = 0;
            }
          }
          if (!(ok && Attach(call, &event.message))) Push(std::move(event));
          break;
        }
        case kWrite:
          Written(call, ok);
          break;
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
      // What was posted meanwhile leaves from here: under load this thread is awake anyway, and
      // the writer thread need not be woken.
      while (true) {
        std::vector<Outgoing> outbox;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          outbox.swap(outbox_);
          if (outbox.empty()) {
            --polling_;
            break;
          }
        }
        for (Outgoing& out : outbox) Start(out);
      }
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
  bool Attach(Call* call, grpc::ByteBuffer* message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (call->start_taken == taken_ && call->start_index < events_.size()) {
      Event& start = events_[call->start_index];
      if (start.id == call->id && start.kind == kStart && !start.has_message) {
        start.message.Swap(message);
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
  std::thread writer_;
  std::condition_variable posted_;  // the writer's wake-up: outbox_ has something, or closing_
  bool closing_ = false;
  std::atomic<int> polling_{0};  // queue threads handling an event (not waiting in Next); lowered under mutex_
  int live_ = 0;  // calls started and not over
  uint64_t taken_ = 0;  // how many times Python has taken the events
  uint64_t next_id_ = 1;
};

}  // namespace remoteloss
