#include <gtest/gtest.h>

#include <stdexcept>

#include "units.hpp"

namespace pflash::bench {
namespace {

TEST(ParseBytes, BinaryDecimalAndPlain) {
  EXPECT_EQ(parse_bytes("16GiB"), 16ull << 30);
  EXPECT_EQ(parse_bytes("512MiB"), 512ull << 20);
  EXPECT_EQ(parse_bytes("1.5kib"), 1536u);
  EXPECT_EQ(parse_bytes("2GB"), 2'000'000'000u);
  EXPECT_EQ(parse_bytes("1000"), 1000u);
  EXPECT_EQ(parse_bytes("none"), std::nullopt);
  EXPECT_EQ(parse_bytes("0"), std::nullopt);
}

TEST(ParseBytes, RejectsWhatItCannotRead) {
  for (const char* bad : {"", "GiB", "16 furlongs", "-1GiB", "1e30TiB", "nan"}) {
    EXPECT_THROW(parse_bytes(bad), std::invalid_argument) << bad;
  }
}

}  // namespace
}  // namespace pflash::bench
