#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input is the system area + volume descriptors; CD001 forced at 0x8001.
    openims_format_fuzz::check(openims_format_fuzz::force(data, 0x8001, b"CD001"));
});
