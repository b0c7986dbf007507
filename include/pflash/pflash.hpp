// Umbrella header.
#pragma once

#include "pflash/attention.hpp"
#include "pflash/dtype.hpp"
#include "pflash/error.hpp"
#include "pflash/naive.hpp"
#include "pflash/runtime.hpp"
#include "pflash/tensor.hpp"
