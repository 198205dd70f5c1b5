//! Real files made by qemu-img: every format it can write is detected with the right virtual
//! size and deemed safe.

mod util;

use openims_format::inspect::{inspect, InspectOptions};
use openims_format::DiskFormat;
use util::*;

struct Case {
    name: &'static str,
    fmt: &'static str,
    opts: &'static [&'static str],
    expect: DiskFormat,
    features: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "raw",
        fmt: "raw",
        opts: &[],
        expect: DiskFormat::Raw,
        features: &[],
    },
    Case {
        name: "qcow2-v2",
        fmt: "qcow2",
        opts: &["compat=0.10"],
        expect: DiskFormat::Qcow2,
        features: &["compat=0.10"],
    },
    Case {
        name: "qcow2-v3",
        fmt: "qcow2",
        opts: &["compat=1.1"],
        expect: DiskFormat::Qcow2,
        features: &["compat=1.1"],
    },
    Case {
        name: "qcow2-zstd",
        fmt: "qcow2",
        opts: &["compression_type=zstd"],
        expect: DiskFormat::Qcow2,
        features: &["zstd"],
    },
    Case {
        name: "qcow2-extl2",
        fmt: "qcow2",
        opts: &["extended_l2=on,cluster_size=128k"],
        expect: DiskFormat::Qcow2,
        features: &["extended-l2"],
    },
    Case {
        name: "qcow2-lazy",
        fmt: "qcow2",
        opts: &["lazy_refcounts=on"],
        expect: DiskFormat::Qcow2,
        features: &["lazy-refcounts"],
    },
    Case {
        name: "qcow2-512",
        fmt: "qcow2",
        opts: &["cluster_size=512"],
        expect: DiskFormat::Qcow2,
        features: &[],
    },
    Case {
        name: "qcow2-2m",
        fmt: "qcow2",
        opts: &["cluster_size=2M"],
        expect: DiskFormat::Qcow2,
        features: &[],
    },
    Case {
        name: "qcow2-prealloc",
        fmt: "qcow2",
        opts: &["preallocation=metadata"],
        expect: DiskFormat::Qcow2,
        features: &[],
    },
    Case {
        name: "vpc",
        fmt: "vpc",
        opts: &[],
        expect: DiskFormat::Vhd,
        features: &["dynamic"],
    },
    Case {
        name: "vpc-fixed",
        fmt: "vpc",
        opts: &["subformat=fixed"],
        expect: DiskFormat::Vhd,
        features: &["fixed"],
    },
    Case {
        name: "vpc-force",
        fmt: "vpc",
        opts: &["force_size=on"],
        expect: DiskFormat::Vhd,
        features: &["dynamic"],
    },
    Case {
        name: "vhdx",
        fmt: "vhdx",
        opts: &[],
        expect: DiskFormat::Vhdx,
        features: &[],
    },
    Case {
        name: "vhdx-bs",
        fmt: "vhdx",
        opts: &["block_size=1M,log_size=1M"],
        expect: DiskFormat::Vhdx,
        features: &[],
    },
    Case {
        name: "vmdk",
        fmt: "vmdk",
        opts: &[],
        expect: DiskFormat::Vmdk,
        features: &["monolithicSparse"],
    },
    Case {
        name: "vmdk-stream",
        fmt: "vmdk",
        opts: &["subformat=streamOptimized"],
        expect: DiskFormat::Vmdk,
        features: &["streamOptimized", "compressed-grains"],
    },
    Case {
        name: "qed",
        fmt: "qed",
        opts: &[],
        expect: DiskFormat::Qed,
        features: &[],
    },
    Case {
        name: "vdi",
        fmt: "vdi",
        opts: &[],
        expect: DiskFormat::Vdi,
        features: &["dynamic"],
    },
    Case {
        name: "vdi-static",
        fmt: "vdi",
        opts: &["static=on"],
        expect: DiskFormat::Vdi,
        features: &["static"],
    },
];

fn check_file(path: &std::path::Path, c: &Case, with_data: bool) {
    let ins = inspect_path(path);
    let info = qemu_info(path, c.fmt);
    let vsize = info["virtual-size"].as_u64().unwrap();
    assert_eq!(ins.format, c.expect, "{}: format", c.name);
    assert_eq!(ins.virtual_size, vsize, "{}: virtual size", c.name);
    assert!(
        ins.is_safe(),
        "{} (data={with_data}): {:?}",
        c.name,
        ins.violations
    );
    for f in c.features {
        assert!(
            ins.features.iter().any(|x| x == f),
            "{}: feature {f} missing in {:?}",
            c.name,
            ins.features
        );
    }
    assert!(
        ins.allocated_size <= ins.virtual_size.max(ins.file_size) + ins.cluster_size.unwrap_or(0),
        "{}: allocated {}",
        c.name,
        ins.allocated_size
    );
    // Declared correctly: still safe. Declared as something else: mismatch.
    let f = std::fs::File::open(path).unwrap();
    let ok = inspect(
        &f,
        &InspectOptions {
            declared_format: Some(c.expect),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ok.is_safe(), "{}: {:?}", c.name, ok.violations);
    let other = if c.expect == DiskFormat::Raw {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    };
    let bad = inspect(
        &f,
        &InspectOptions {
            declared_format: Some(other),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        bad.has_violation("image.declared_format_mismatch"),
        "{}",
        c.name
    );
    // Shallow mode agrees on safety.
    let shallow = inspect(
        &f,
        &InspectOptions {
            deep: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(shallow.is_safe(), "{}: {:?}", c.name, shallow.violations);
}

#[test]
fn qemu_img_created_empty_images_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    for c in CASES {
        let path = p(dir.path(), &format!("{}.img", c.name));
        let mut args = vec!["create", "-q", "-f", c.fmt];
        if !c.opts.is_empty() {
            args.push("-o");
            args.extend(c.opts);
        }
        let ps = path.to_str().unwrap();
        args.extend([ps, "64M"]);
        qemu_img(&args);
        check_file(&path, c, false);
    }
}

#[test]
fn qemu_img_converted_images_with_data_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(dir.path(), "src.raw");
    make_source_raw(&src, 70 * MIB);
    for c in CASES {
        let path = p(dir.path(), &format!("{}.conv", c.name));
        let mut args = vec!["convert", "-q", "-O", c.fmt];
        if !c.opts.is_empty() {
            args.push("-o");
            args.extend(c.opts);
        }
        let (s, d) = (src.to_str().unwrap(), path.to_str().unwrap());
        args.extend(["-f", "raw", s, d]);
        qemu_img(&args);
        check_file(&path, c, true);
        let ins = inspect_path(&path);
        if c.expect != DiskFormat::Raw
            && !c.name.contains("fixed")
            && !c.name.contains("static")
            && !c.name.contains("prealloc")
        {
            assert!(
                ins.allocated_size >= MIB / 4,
                "{}: allocated {}",
                c.name,
                ins.allocated_size
            );
            assert!(
                ins.allocated_size < 70 * MIB,
                "{}: allocated {}",
                c.name,
                ins.allocated_size
            );
        }
    }
}

#[test]
fn compressed_qcow2_zlib_and_zstd_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(dir.path(), "src.raw");
    make_source_raw(&src, 40 * MIB);
    for (name, opts) in [
        ("zlib", "compat=1.1"),
        ("zstd", "compression_type=zstd"),
        ("v2", "compat=0.10"),
        ("2m", "cluster_size=2M"),
        ("4k", "cluster_size=4k"),
    ] {
        let path = p(dir.path(), &format!("c-{name}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            "-f",
            "raw",
            src.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        let ins = inspect_path(&path);
        assert!(ins.is_safe(), "{name}: {:?}", ins.violations);
        assert!(
            ins.features.iter().any(|f| f == "compressed-clusters"),
            "{name}: {:?}",
            ins.features
        );
        assert_eq!(ins.virtual_size, 40 * MIB);
    }
}

#[test]
fn odd_sizes_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for c in CASES.iter().filter(|c| c.expect != DiskFormat::Raw) {
        for size in ["1000000", "3G", "513"] {
            let path = p(dir.path(), &format!("{}-{size}.img", c.name));
            let mut args = vec!["create", "-q", "-f", c.fmt];
            if !c.opts.is_empty() {
                args.push("-o");
                args.extend(c.opts);
            }
            let ps = path.to_str().unwrap();
            args.extend([ps, size]);
            if (c.name.contains("fixed")
                || c.name.contains("static")
                || c.name.contains("prealloc"))
                && size == "3G"
            {
                continue;
            }
            qemu_img(&args);
            check_file(&path, c, false);
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn vmdk_stream_optimized_with_footer_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(dir.path(), "src.raw");
    make_source_raw(&src, 40 * MIB);
    let path = p(dir.path(), "s.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "-f",
        "raw",
        src.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let with_footer = vmdk_stream_with_footer(&std::fs::read(&path).unwrap());
    std::fs::write(&path, &with_footer).unwrap();
    let ins = inspect_path(&path);
    assert!(ins.is_safe(), "{:?}", ins.violations);
    assert_eq!(ins.virtual_size, 40 * MIB);
    match &ins.details {
        openims_format::inspect::Details::Vmdk(v) => assert!(v.footer.is_some()),
        d => panic!("{d:?}"),
    }
    // qemu agrees the file is fine.
    assert_eq!(
        qemu_info(&path, "vmdk")["virtual-size"].as_u64(),
        Some(40 * MIB)
    );
}
