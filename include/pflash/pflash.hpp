// Umbrella header.
#pragma once

#include "pflash/attention.hpp"
#include "pflash/decode.hpp"
#include "pflash/dtype.hpp"
#include "pflash/error.hpp"
#include "pflash/kv_cache.hpp"
#include "pflash/mask.hpp"
#include "pflash/merge.hpp"
#include "pflash/naive.hpp"
#include "pflash/runtime.hpp"
#include "pflash/shard_layout.hpp"
#include "pflash/tensor.hpp"
