// The bench's two outputs: a table for people and JSON for scripts (key names are a contract).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "decode_bench.hpp"
#include "machine_peak.hpp"
#include "sweep.hpp"

namespace pflash::bench {

std::string format_machine(const MachinePeak& peak);
std::string format_table_header();
std::string format_row(const BenchResult& result);

std::string format_decode_header();
std::string format_decode_row(const DecodeBenchResult& result);

// Attention rows carry "mode": "attention", decode rows "mode": "decode", in one "results" array.
nlohmann::json to_json(const MachinePeak& peak, const std::vector<BenchResult>& results,
                       const std::vector<DecodeBenchResult>& decode_results = {});

std::string format_bytes(double bytes);  // "1.50 GiB", "64.0 MiB", "512 B"

// A row above its measured ceiling (%peak or %bw over 100%) is a measurement problem, not a result:
// the table marks it with '!', its JSON says "above_ceiling": true, and the run ends with this note.
bool above_ceiling(const BenchResult& result);
bool above_ceiling(const DecodeBenchResult& result);
std::string format_above_ceiling_note(const MachinePeak& before, const MachinePeak& after);

}  // namespace pflash::bench
