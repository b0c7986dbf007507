// What every pflash command writes besides its table: a progress line, and the JSON file.
#pragma once

#include <unistd.h>

#include <fstream>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

namespace pflash::tool {

// A progress line on stderr: rewritten in place on a terminal, one line per row otherwise.
class Progress {
 public:
  Progress() : tty_(isatty(STDERR_FILENO) != 0) {}
  void show(const std::string& line) const {
    std::cout << std::flush;  // the table rows written so far come first, not after this line
    if (tty_) {
      std::cerr << "\r\033[K" << line << std::flush;
    } else {
      std::cerr << line << '\n';
    }
  }
  void clear() const {
    if (tty_) std::cerr << "\r\033[K" << std::flush;
  }

 private:
  bool tty_;
};

inline int write_json(const std::string& path, const nlohmann::json& json) {
  if (path.empty()) return 0;
  std::ofstream out(path);
  if (!out) {
    std::cerr << "pflash: cannot write --json file '" << path << "'\n";
    return 1;
  }
  out << json.dump(2) << '\n';
  std::cerr << "wrote " << path << '\n';
  return 0;
}

}  // namespace pflash::tool
