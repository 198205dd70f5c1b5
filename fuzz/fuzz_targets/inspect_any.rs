#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    openims_format_fuzz::check(data.to_vec());
});
