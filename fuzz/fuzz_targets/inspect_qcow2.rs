#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Version byte picks v2/v3/other; the rest is the fuzzer's.
    openims_format_fuzz::check(openims_format_fuzz::force(data, 0, b"QFI\xfb"));
});
