// The native front's acceptor: the gRPC port's connections, counted (see front.h).
#pragma once

#include <fcntl.h>
#include <grpcpp/server_builder.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <memory>
#include <thread>
#include <unordered_map>
#include <vector>

namespace remoteloss {

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

}  // namespace remoteloss
