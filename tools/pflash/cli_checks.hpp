// Checks of the command line's values that say what is expected ("--seq: expected positive
// integers, got 0"), where CLI11's own number validators print their range as doubles, and checks
// of what a sweep needs before its first timed call (an output path that can be written).
#pragma once

#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>

#include <CLI/CLI.hpp>

namespace pflash::tool {

// An integer in [low, high]; `what` names the values in the message ("positive integers").
inline CLI::Validator integer_in(std::int64_t low, std::int64_t high, std::string what) {
  return CLI::Validator(
      [low, high, what](std::string& text) {
        std::int64_t value = 0;
        const char* end = text.data() + text.size();
        const auto [stop, error] = std::from_chars(text.data(), end, value);
        if (text.empty() || error != std::errc() || stop != end || value < low || value > high) {
          return "expected " + what + ", got '" + text + "'";
        }
        return std::string();
      },
      what);
}

inline CLI::Validator positive_integers() {
  return integer_in(1, std::numeric_limits<std::int64_t>::max(), "positive integers");
}

inline CLI::Validator non_negative_integer() {
  return integer_in(0, std::numeric_limits<std::int64_t>::max(), "an integer >= 0");
}

inline CLI::Validator integers_from(std::int64_t low, std::int64_t high) {
  return integer_in(low, high, "integers from " + std::to_string(low) + " to " + std::to_string(high));
}

inline CLI::Validator positive_number() {
  return CLI::Validator(
      [](std::string& text) {
        try {
          std::size_t used = 0;
          const double value = std::stod(text, &used);
          if (used == text.size() && value > 0 && value < std::numeric_limits<double>::infinity()) return std::string();
        } catch (const std::exception&) {
        }
        return "expected a positive number, got '" + text + "'";
      },
      "a positive number");
}

// Empty when `path` can be written, else why not; an existing file is left as it was and a file
// this check creates is removed again, so that a run that fails later leaves nothing behind.
inline std::string check_writable(const std::string& path) {
  if (path.empty()) return "";
  const bool existed = access(path.c_str(), F_OK) == 0;
  std::ofstream probe(path, std::ios::app);
  if (!probe) return "cannot write '" + path + "': " + std::strerror(errno);
  probe.close();
  if (!existed) std::remove(path.c_str());
  return "";
}

}  // namespace pflash::tool
