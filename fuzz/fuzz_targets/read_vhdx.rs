#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    // Signature forced, header and region table CRCs repaired.
    openims_format_fuzz::check_read(openims_format_fuzz::vhdx(data), DiskFormat::Vhdx);
});
