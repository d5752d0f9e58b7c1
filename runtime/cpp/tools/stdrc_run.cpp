// stdrc_run: sample + decode one video from a bundle of aoti packages and an inputs folder.
//
//   stdrc_run --bundle DIR --inputs DIR --out DIR [--bucket FxWxH] [--stages 1|2] [--text-scale X] [--ref-scale X]
//             [--guidance-interval LO,HI] [--cfg-rescale X] [--sigmas FILE.npy | --distilled] [--max-batch N]
//             [--device cpu|cuda[:i]] [--trust-bundle-code] [--quiet]
//
// Errors print as one line on stderr and exit 2 (bad input or bundle) or 1 (anything else).
#include <cmath>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include <unistd.h>

#include "stdrc/errors.h"
#include "stdrc/runner.h"

namespace {

constexpr const char* kUsage =
    "usage: stdrc_run --bundle DIR --inputs DIR --out DIR [--bucket FRAMESxWIDTHxHEIGHT] [--stages 1|2] [--text-scale X] "
    "[--ref-scale X] "
    "[--guidance-interval LO,HI] [--cfg-rescale X] [--sigmas FILE.npy | --distilled] [--max-batch N] "
    "[--device cpu|cuda[:i]] [--trust-bundle-code] [--quiet]";

struct Options {
  std::string bundle, inputs, out, sigmas, bucket, device = "cpu";
  std::optional<double> text_scale, ref_scale, rescale;
  std::optional<std::pair<double, double>> interval;
  bool distilled = false, quiet = false, trust = false;
  int max_batch = 3;
  int stages = 0;  // 0: as the inputs were written (else the bundle's default)
};

double number(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size() && std::isfinite(value)) return value;
  } catch (const std::exception&) {
  }
  throw stdrc::InputError(flag + " " + text + ": not a finite number");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    }
    if (flag == "--distilled") { o.distilled = true; continue; }
    if (flag == "--quiet") { o.quiet = true; continue; }
    if (flag == "--trust-bundle-code") { o.trust = true; continue; }
    if (i + 1 >= argc) throw stdrc::InputError(flag + " needs a value (" + kUsage + ")");
    const std::string value = argv[++i];
    if (flag == "--bundle") o.bundle = value;
    else if (flag == "--inputs") o.inputs = value;
    else if (flag == "--out") o.out = value;
    else if (flag == "--device") o.device = value;
    else if (flag == "--bucket") o.bucket = value;
    else if (flag == "--sigmas") o.sigmas = value;
    else if (flag == "--text-scale") o.text_scale = number(flag, value);
    else if (flag == "--ref-scale") o.ref_scale = number(flag, value);
    else if (flag == "--cfg-rescale") o.rescale = number(flag, value);
    else if (flag == "--max-batch") o.max_batch = static_cast<int>(number(flag, value));
    else if (flag == "--stages") {
      if (value != "1" && value != "2") throw stdrc::InputError("--stages " + value + ": use 1 or 2");
      o.stages = value == "1" ? 1 : 2;
    }
    else if (flag == "--guidance-interval") {
      const auto comma = value.find(',');
      if (comma == std::string::npos) throw stdrc::InputError("--guidance-interval " + value + ": use LO,HI");
      o.interval = std::make_pair(number(flag, value.substr(0, comma)), number(flag, value.substr(comma + 1)));
    } else {
      throw stdrc::InputError("unknown option " + flag + " (" + kUsage + ")");
    }
  }
  if (o.distilled && !o.sigmas.empty()) throw stdrc::InputError("pass --sigmas or --distilled, not both");
  // the same option rules as stdrc.runtime.options.GenerationOptions
  if (o.rescale && (*o.rescale < 0 || *o.rescale > 1)) throw stdrc::InputError("--cfg-rescale: use a number in [0, 1]");
  if (o.interval && (o.interval->first > o.interval->second || o.interval->first < 0 || o.interval->second > 1))
    throw stdrc::InputError("--guidance-interval LO,HI: use 0 <= LO <= HI <= 1");
  for (const auto& scale : {o.text_scale, o.ref_scale})
    if (scale && std::abs(*scale) > 100) throw stdrc::InputError("guidance scales must be within [-100, 100]");
  if (o.max_batch < 1 || o.max_batch > 3) throw stdrc::InputError("--max-batch: use 1, 2 or 3");
  if (o.bundle.empty() || o.inputs.empty() || o.out.empty())
    throw stdrc::InputError(std::string("--bundle, --inputs and --out are required (") + kUsage + ")");
  return o;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// On a terminal the step counter rewrites one line; in a log (not a tty) each step is its own line.
bool g_tty = false;
bool g_line_open = false;  // a \r progress line is on screen and needs a newline before anything else

void end_progress_line() {
  if (g_line_open) std::fputc('\n', stderr);
  g_line_open = false;
}

int run(const Options& o) {
  g_tty = isatty(fileno(stderr)) != 0;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto runner = stdrc::Runner::from_bundle(o.bundle, c10::Device(o.device), o.trust);
  if (!o.bucket.empty()) runner->select_bucket(o.bucket);
  stdrc::RunInputs in = runner->read_inputs(o.inputs, o.stages);
  if (o.distilled) in.sigmas = runner->manifest().distilled_sigmas;
  if (!o.sigmas.empty()) in.sigmas = stdrc::read_sigmas(o.sigmas);
  if (o.text_scale) in.scales.text = *o.text_scale;
  if (o.ref_scale) in.scales.ref = *o.ref_scale;
  if (o.rescale) in.scales.rescale = *o.rescale;
  if (o.interval) in.scales.interval = o.interval;
  const auto t1 = clock::now();
  const int steps = runner->total_steps(in), stage1 = static_cast<int>(in.sigmas.size()) - 1;
  auto on_step = [&](int i) {
    if (o.quiet) return;
    // a two-stage run names the stage as the Python CLI's bar does: guided at the half grid, then the refinement
    const std::string stage = in.stages == 2 ? (i < stage1 ? " stage 1/2 (half size)" : " stage 2/2 (refine)") : "";
    if (g_tty) {
      std::fprintf(stderr, "\rstep %d/%d%s", i + 1, steps, stage.c_str());
      g_line_open = true;
    } else {
      std::fprintf(stderr, "step %d/%d%s\n", i + 1, steps, stage.c_str());
    }
  };
  const stdrc::RunOutputs out = runner->run(in, o.max_batch, on_step);
  stdrc::write_outputs(out, o.out);
  const auto t2 = clock::now();
  if (!o.quiet) {
    const auto secs = [](auto d) { return std::chrono::duration<double>(d).count(); };
    end_progress_line();
    std::fprintf(stderr, "load %.2f s, sample+decode %.2f s -> %s\n", secs(t1 - t0), secs(t2 - t1), o.out.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const stdrc::Error& e) {
    end_progress_line();
    std::cerr << "stdrc_run: error: " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    end_progress_line();
    std::cerr << "stdrc_run: error: libtorch: " << first_line(e.what_without_backtrace()) << std::endl;
    return 1;
  } catch (const std::exception& e) {
    end_progress_line();
    std::cerr << "stdrc_run: error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}
