#include "support/attention_cases.hpp"

#include <sstream>

namespace pflash::testing {

std::string case_name(const Case& c, CpuIsa isa) {
  const Shape& s = c.shape;
  std::ostringstream name;
  name << "B" << s.batch << "_Hq" << s.heads_q << "_Hkv" << s.heads_kv << "_Nq" << s.seq_q << "_Nk" << s.seq_k << "_D"
       << s.dim << (c.causal ? "_causal_" : "_full_") << to_string(c.dtype);
  if (c.layout == Layout::kBnhd) name << "_bnhd";
  if (c.layout == Layout::kPaddedRows) name << "_padded";
  name << "_" << to_string(isa);
  return name.str();
}

std::vector<Case> attention_cases() {
  std::vector<Shape> shapes = {
      {1, 1, 1, 1, 1, 64},        // N = 1
      {1, 2, 2, 1, 300, 128},     // one query, many keys
      {1, 2, 1, 300, 1, 64},      // many queries, one key
      {2, 4, 4, 17, 33, 64},      // odd lengths
      {1, 4, 2, 129, 129, 96},    // GQA 2, D = 96, lengths one past a power of two
      {1, 8, 2, 100, 257, 80},    // GQA 4, Nq < Nk
      {1, 8, 1, 257, 100, 40},    // MQA (GQA 8), Nq > Nk: causal rows with no visible key
      {2, 3, 3, 64, 64, 128},     // aligned
      {1, 2, 2, 200, 190, 256},   // the largest head_dim
  };
  for (std::int64_t dim : {1, 16, 40, 64, 80, 96, 128, 256}) shapes.push_back({2, 4, 2, 37, 53, dim});
  std::vector<Case> cases;
  for (const Shape& s : shapes)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16})
      for (bool causal : {false, true}) cases.push_back({s, causal, dtype});
  for (Layout layout : {Layout::kBnhd, Layout::kPaddedRows})
    for (bool causal : {false, true}) cases.push_back({{2, 4, 2, 45, 70, 96}, causal, DType::kBFloat16, layout});
  return cases;
}

}  // namespace pflash::testing
