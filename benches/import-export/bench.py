"""Import and export through the embedded bucket, driven like a user: boto3 uploads a qcow2 file,
the IMS SDK imports it (create_image with image_url) and exports it back (qcow2, which shares
the image's chunks, then vhd, which streams every byte through the writer), and the job
times are compared with `dd` sequential write speed measured in the same run. Peak RSS is the
server's VmHWM, per phase (upload, import, export; reset between phases). Usage: bench.py WORKDIR OPENIMS_BIN VIRTUAL_GIB DATA_GIB"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "e2e"))
os.environ.setdefault("OPENIMS_BIN", sys.argv[2])
import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402
from huaweicloudsdkims.v2 import (CreateImageRequest, CreateImageRequestBody, ExportImageRequest,  # noqa: E402
                                  ExportImageRequestBody, ShowJobRequest)

import helpers  # noqa: E402

work, vgib, dgib = Path(sys.argv[1]), int(sys.argv[3]), float(sys.argv[4])
# Part size of the qcow2 upload (PART_MIB, default 64; boto3 and the aws CLI default to 8).
PART_MIB = int(os.environ.get("PART_MIB", "64"))
GiB, MiB = 1 << 30, 1 << 20
work.mkdir(parents=True, exist_ok=True)

# The source: VIRTUAL_GIB virtual, DATA_GIB of random data in 64 MiB runs spread over the disk,
# each run its own random bytes (so every data chunk is distinct: nothing deduplicates).
raw = work / f"src-{vgib}.raw"
data_bytes = int(dgib * GiB)
runs = data_bytes // (64 * MiB)
with open(raw, "wb") as f:
    f.truncate(vgib * GiB)
    step = (vgib * GiB) // runs
    for i in range(runs):
        f.seek(i * step)
        f.write(os.urandom(64 * MiB))
src = work / f"src-{vgib}.qcow2"
subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
os.sync()  # the kernel would otherwise write these 2 GiB back in the middle of a phase
with_raw = vgib <= 4  # the raw import (uploads every byte, zeros too) only for the small image
if not with_raw:
    raw.unlink()

srv = helpers.Server(work / f"data-{vgib}", work / f"server-{vgib}.log").start()
try:
    t = helpers.default_tenant(srv)
    s3 = boto3.client("s3", endpoint_url=srv.s3_endpoint, aws_access_key_id=t.ak, aws_secret_access_key=t.sk,
                      region_name="local-1", config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    s3.create_bucket(Bucket="bench")
    t0 = time.monotonic()
    s3.upload_file(str(src), "bench", "src.qcow2",
                   Config=TransferConfig(multipart_chunksize=PART_MIB * MiB, max_concurrency=2))
    upload_s = time.monotonic() - t0

    def hwm_mib(reset=False):
        """The server's peak RSS since the last reset (VmHWM; clear_refs 5 resets it)."""
        v = int(next(l for l in open(f"/proc/{srv.pid}/status") if l.startswith("VmHWM")).split()[1]) / 1024
        if reset:
            with open(f"/proc/{srv.pid}/clear_refs", "w") as f:
                f.write("5")
        return round(v, 1)

    upload_rss = hwm_mib(reset=True)

    def run_job(job_id):
        t0 = time.monotonic()
        while True:
            j = t.ims.show_job(ShowJobRequest(job_id=job_id))
            if j.status in ("SUCCESS", "FAIL"):
                assert j.status == "SUCCESS", j
                return j, time.monotonic() - t0
            time.sleep(0.05)

    def cpu_s():
        """The server's CPU time so far (user + system), in seconds."""
        f = Path(f"/proc/{srv.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    # PERF_OUT=FILE records a profile of the server during the import (perf record -g).
    perf = None
    if os.environ.get("PERF_OUT"):
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p", str(srv.pid), "-o", os.environ["PERF_OUT"]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # perf attaches before the import starts
    cpu0 = cpu_s()
    job, import_s = run_job(t.ims.create_image(CreateImageRequest(body=CreateImageRequestBody(
        name="bench", image_url="bench:src.qcow2", min_disk=max(1, vgib)))).job_id)
    image_id = job.entities.image_id
    import_cpu_s = cpu_s() - cpu0
    if perf:
        perf.send_signal(2)
        perf.wait()
    import_rss = hwm_mib(reset=True)
    job, export_s = run_job(t.ims.export_image(ExportImageRequest(image_id=image_id, body=ExportImageRequestBody(
        bucket_url="bench:out.qcow2", file_format="qcow2"))).job_id)
    export_rss = hwm_mib(reset=True)
    out_size = s3.head_object(Bucket="bench", Key="out.qcow2")["ContentLength"]
    # VHD: the streaming writer (every data byte read, re-laid out and written), where qcow2
    # above references the image's chunks.
    job, vhd_s = run_job(t.ims.export_image(ExportImageRequest(image_id=image_id, body=ExportImageRequestBody(
        bucket_url="bench:out.vhd", file_format="vhd"))).job_id)
    vhd_rss = hwm_mib()
    raw_import_s = None
    if with_raw:
        # A raw file uploaded in boto3's 8 MiB parts: imported by reference to its chunks.
        s3.upload_file(str(raw), "bench", "src.raw",
                       Config=TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=2))
        raw.unlink()
        job, raw_import_s = run_job(t.ims.create_image(CreateImageRequest(body=CreateImageRequestBody(
            name="bench-raw", image_url="bench:src.raw", min_disk=max(1, vgib)))).job_id)
finally:
    srv.terminate()
print(json.dumps({
    "virtual_gib": vgib, "data_bytes": data_bytes, "file_bytes": src.stat().st_size, "export_bytes": out_size,
    "upload_s": round(upload_s, 2), "import_s": round(import_s, 2), "import_cpu_s": round(import_cpu_s, 2), "export_s": round(export_s, 2),
    "import_mb_s": round(data_bytes / import_s / 1e6, 1), "export_mb_s": round(data_bytes / export_s / 1e6, 1),
    "vhd_s": round(vhd_s, 2), "vhd_mb_s": round(data_bytes / vhd_s / 1e6, 1),
    "peak_rss_mib": max(upload_rss, import_rss, export_rss, vhd_rss),
    "upload_rss_mib": upload_rss, "import_rss_mib": import_rss, "export_rss_mib": export_rss,
    "vhd_rss_mib": vhd_rss, "raw_import_s": raw_import_s and round(raw_import_s, 3),
}))
src.unlink()
