// Typed errors: each message names the fix; the CLI prints it as one line and exits non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace stdrc {

// Base of every error the CLI turns into one clear line.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bundle is missing, truncated, from another format version or another backend.
class BundleError : public Error {
 public:
  using Error::Error;
};

// A user input (an .npy file, a scale, a flag) cannot be used.
class InputError : public Error {
 public:
  using Error::Error;
};

}  // namespace stdrc
