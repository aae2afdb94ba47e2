// remoteloss_server._front: the native front (front.h) as a Python type, Front.
//
// Python's grpc.aio costs a request about four times the CPU the same call costs in gRPC's C++
// core (bench/server_cpu.py: its "echo" and "echo-c++" rows). remoteloss_server.native_front runs
// the server's own handlers on what this module hands it; README, "The gRPC front".

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <grpcpp/resource_quota.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "front.h"

namespace {

using remoteloss::Event;
using remoteloss::Front;
using remoteloss::kDone;
using remoteloss::kHalfClose;
using remoteloss::kMessage;
using remoteloss::kStart;
using remoteloss::kWritten;

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
  static const char* names[] = {"listeners", "options", "max_connections", "threads", "memory_bytes", "tls", nullptr};
  PyObject *listening, *options, *tls = Py_None;
  int max_connections, threads = 1;
  long long memory = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOi|iLO", const_cast<char**>(names), &listening, &options,
                                   &max_connections, &threads, &memory, &tls)) {
    return -1;
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls != Py_None) {  // (certificate chain, private key, client CA or "", seconds between reads)
    const char *cert, *key, *client_ca;
    unsigned int refresh_s;
    if (!PyArg_ParseTuple(tls, "sssI", &cert, &key, &client_ca, &refresh_s)) return -1;
    credentials = remoteloss::WatchedTls(cert, key, client_ca, refresh_s);
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
  Py_BEGIN_ALLOW_THREADS started = self->front->Start(builder, std::move(listeners), max_connections, threads,
                                                       credentials);
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

PyObject* ReadMethod(PyFront* self, PyObject* args) {
  unsigned long long id;
  int count;
  if (!PyArg_ParseTuple(args, "Ki", &id, &count)) return nullptr;
  if (count < 1) {
    PyErr_SetString(PyExc_ValueError, "read(id, n): n must be at least 1");
    return nullptr;
  }
  bool reading;
  Py_BEGIN_ALLOW_THREADS reading = self->front->Read(id, count);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(reading);
}

PyObject* WriteMethod(PyFront* self, PyObject* args) {
  unsigned long long id;
  PyObject* data;
  if (!PyArg_ParseTuple(args, "KO", &id, &data)) return nullptr;
  grpc::ByteBuffer buffer;
  if (!ToBuffer(data, &buffer)) return nullptr;
  bool taken;
  Py_BEGIN_ALLOW_THREADS taken = self->front->Write(id, &buffer);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(taken);
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
    {"read", reinterpret_cast<PyCFunction>(ReadMethod), METH_VARARGS,
     "read(id, n): ask for the call's next n messages (see front.h)."},
    {"write", reinterpret_cast<PyCFunction>(WriteMethod), METH_VARARGS,
     "write(id, data): send a message; False: the call's queue is full, so wait for WRITTEN."},
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
