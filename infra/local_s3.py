"""A local S3 endpoint for development: moto's server over HTTP on localhost.

    python infra/local_s3.py [--port 5055] [--bucket unusual] [--seed-sample-data]

Prints the environment to export, then serves until interrupted. Everything is
in memory and gone when it stops. For a persistent local store, use MinIO
(``infra/docker-compose.minio.yml``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5055)
    p.add_argument("--bucket", default="unusual", help="bucket to create (default: unusual)")
    p.add_argument(
        "--seed-sample-data",
        action="store_true",
        help="upload the shipped sample data as Parquet shards under s3://BUCKET/sample/",
    )
    args = p.parse_args(argv)

    import pyarrow.parquet as pq
    import s3fs
    from unusual.ray_jobs.local_s3 import local_s3

    with local_s3(args.host, args.port, bucket=args.bucket) as env:
        fs = s3fs.S3FileSystem()
        if args.seed_sample_data:
            from unusual.ray_jobs import sample_data

            for name in sample_data.SETS:
                table = sample_data.load(name)
                step = -(-table.num_rows // 4)
                for i in range(4):
                    with fs.open(f"{args.bucket}/sample/{name}/part-{i:03d}.parquet", "wb") as f:
                        pq.write_table(table.slice(i * step, step), f)
        for k, v in env.items():
            print(f"export {k}={v}")
        print(
            f"# bucket: s3://{args.bucket}"
            + (f"  sample data: s3://{args.bucket}/sample/" if args.seed_sample_data else "")
        )
        sys.stdout.flush()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
