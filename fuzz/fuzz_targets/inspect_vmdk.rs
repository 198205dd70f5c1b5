#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text descriptors (starting with '#' or "version=") are fuzzed as they are; anything else
    // becomes a hosted sparse extent.
    if data.starts_with(b"#") || data.starts_with(b"version=") {
        openims_format_fuzz::check(data.to_vec());
    } else {
        openims_format_fuzz::check(openims_format_fuzz::force(data, 0, b"KDMV"));
    }
});
