"""Command line: build the maskfreevis_vis TFDS dataset from a local folder.

  python -m maskfreevis_jax.data.build_tfds --config=ytvis_2019 \\
      --manual_dir=/data/ytvis_2019 --data_dir=/data/tfds
"""

from collections.abc import Sequence

from absl import logging

from maskfreevis_jax import console
from maskfreevis_jax.data import tfds_builders


def main(argv: Sequence[str] | None = None) -> None:
  """Command line wrapper around `build_dataset`."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description="Build the maskfreevis_vis TFDS dataset.")
  parser.add_argument(
      "--config",
      default="synthetic",
      choices=[c.name for c in tfds_builders.MaskfreevisVis.BUILDER_CONFIGS],
  )
  parser.add_argument("--manual_dir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--file_format", default="array_record", choices=["array_record", "tfrecord"])
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  console.enable_echo()
  builder = tfds_builders.build_dataset(
      args.manual_dir, args.data_dir, args.config, file_format=args.file_format
  )
  console.report(str(builder.info.splits))


if __name__ == "__main__":
  main()
