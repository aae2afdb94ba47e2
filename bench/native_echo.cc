// A bare gRPC echo in C++: what the transport costs per call without Python, beside the Python
// echo (echo_server.py) that remoteloss is measured against. Every method answers the request's
// bytes unchanged, as echo_server.py does; remoteloss-server's message-size limits.
//
//     bench/.native/echo PORT      (built by bench/servers.py: Server.native_echo)
//
// One asynchronous generic service on one completion queue, polled by the main thread.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <string>

namespace {

constexpr int kLimit = 512 * 1024 * 1024;  // remoteloss-server's default max_message_bytes

// One call: asked for, its request read, the same bytes written back with status OK.
class Call {
 public:
  Call(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue)
      : service_(service), queue_(queue), stream_(&context_) {
    service_->RequestCall(&context_, &stream_, queue_, queue_, this);
  }

  void Proceed(bool ok) {
    switch (state_) {
      case State::kAsked:
        new Call(service_, queue_);  // the next call
        if (!ok) break;
        state_ = State::kReading;
        stream_.Read(&request_, this);
        return;
      case State::kReading:
        if (!ok) break;
        state_ = State::kAnswering;
        stream_.WriteAndFinish(request_, grpc::WriteOptions(), grpc::Status::OK, this);
        return;
      case State::kAnswering:
        break;
    }
    delete this;
  }

 private:
  enum class State { kAsked, kReading, kAnswering };
  grpc::AsyncGenericService* service_;
  grpc::ServerCompletionQueue* queue_;
  grpc::GenericServerContext context_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer request_;
  State state_ = State::kAsked;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials());
  builder.SetMaxReceiveMessageSize(kLimit);
  builder.SetMaxSendMessageSize(kLimit);
  builder.RegisterAsyncGenericService(&service);
  auto queue = builder.AddCompletionQueue();
  auto server = builder.BuildAndStart();
  if (!server) return 1;
  new Call(&service, queue.get());
  void* tag;
  bool ok;
  while (queue->Next(&tag, &ok)) static_cast<Call*>(tag)->Proceed(ok);
}
