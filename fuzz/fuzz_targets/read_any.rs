#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::inspect::{inspect, InspectOptions};
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    // No magic forced: whatever inspect detects (raw, iso, or any format) is opened with that
    // format's reader, and the file is also read as raw (what raw and iso uploads go through).
    let ins =
        inspect(&data.to_vec(), &InspectOptions::default()).expect("in-memory inspect never fails");
    openims_format_fuzz::check_read(data.to_vec(), ins.format);
    if ins.format != DiskFormat::Raw {
        openims_format_fuzz::check_read(data.to_vec(), DiskFormat::Raw);
    }
});
