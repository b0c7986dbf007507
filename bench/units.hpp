// Byte sizes as people write them on the command line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace pflash::bench {

// "16GiB", "512MiB", "64KiB" (binary), "2GB", "500MB", "1kB" (decimal), "1000" or "1000B" (bytes);
// "none" or "0": no limit. Throws std::invalid_argument naming what it could not read.
std::optional<std::uint64_t> parse_bytes(const std::string& text);

}  // namespace pflash::bench
