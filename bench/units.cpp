#include "units.hpp"

#include <cctype>
#include <cmath>
#include <stdexcept>

namespace pflash::bench {

std::optional<std::uint64_t> parse_bytes(const std::string& text) {
  if (text == "none" || text == "0") return std::nullopt;
  std::size_t pos = 0;
  double value = 0.0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw std::invalid_argument("expected a size such as 16GiB, 512MiB, 2GB or none, got '" + text + "'");
  }
  std::string unit = text.substr(pos);
  for (char& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double scale = 0.0;
  if (unit.empty() || unit == "b") scale = 1.0;
  else if (unit == "kib") scale = 0x1p10;
  else if (unit == "mib") scale = 0x1p20;
  else if (unit == "gib") scale = 0x1p30;
  else if (unit == "tib") scale = 0x1p40;
  else if (unit == "kb") scale = 1e3;
  else if (unit == "mb") scale = 1e6;
  else if (unit == "gb") scale = 1e9;
  else if (unit == "tb") scale = 1e12;
  if (scale == 0.0 || !(value > 0.0) || !std::isfinite(value) || value * scale >= 0x1p64) {
    throw std::invalid_argument("expected a size such as 16GiB, 512MiB, 2GB or none, got '" + text + "'");
  }
  return static_cast<std::uint64_t>(value * scale);
}

}  // namespace pflash::bench
