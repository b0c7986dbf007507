// Checking that a call rejects its arguments with pflash::Error and a message that names the
// function, the argument, what was expected and what was given.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "pflash/error.hpp"

namespace pflash::testing {

template <class Call>
void expect_invalid_argument(Call&& call, const std::string& function, const std::string& argument,
                             const std::string& expected, const std::string& got = "") {
  try {
    call();
    ADD_FAILURE() << function << ": no error for a bad '" << argument << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << message;
    EXPECT_EQ(message.rfind(function + ": argument '" + argument + "': expected ", 0), 0u) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
    EXPECT_NE(message.find(got), std::string::npos) << message;
  }
}

}  // namespace pflash::testing
