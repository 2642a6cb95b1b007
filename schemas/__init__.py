"""The packed-record schema and its formats: one definition (schemas.Schema, SCHEMA_VERSION) from which
the TFRecord feature spec, the Arrow/Parquet schema, the writers, the readers and verify() derive.

Heavy frameworks (tensorflow, pyarrow, array_record, datasets, torch) are imported inside the functions that use
them; reading any format (read, verify, decode_example, hf_dataset, PackedDataset) needs no TensorFlow, only
tf_dataset does. The names in `__all__` are the public API; the `_modules` are private, the format registry
(`_formats`) included.
"""
from ._dataset import NoRandomAccess, PackedDataset
from ._datasets import hf_dataset
from ._hf import siglip2_inputs, timm_naflex_inputs
from ._io import (MANIFEST, REJECTS, CorruptShard, ManifestError, ManifestMissing, OutputDirError, OutputWriteError,
                  claim_output, new_run_id, prepare_output_dir, read, read_manifest, rejects_path, remove_unlisted,
                  sha256_file, shard_paths, write_dataset, write_manifest, write_rejects, write_shard)
from ._owner import LOCK, OutputClaim, OutputLocked, OwnershipLost
from ._masks import attention_mask, cu_seqlens, flex_block_mask, pooling_matrix, tf_attention_mask, tf_pooling_matrix
from ._formats import FORMATS, record_encoder
from ._schema import SCHEMA_VERSION, RecordError, Schema, SchemaError
from ._split import ShardArgumentError
from ._tf import tf_dataset
from ._tfrecord import decode_example
from ._verify import VerificationError, VerifyReport, verify

__all__ = [
    # the record schema and the formats it is written in
    "Schema", "SCHEMA_VERSION", "FORMATS", "SchemaError", "RecordError",
    # reading packed output: records, tf.data, the manifest, verification
    "read", "tf_dataset", "hf_dataset", "decode_example", "read_manifest", "shard_paths", "rejects_path", "verify",
    "VerifyReport",
    "VerificationError",
    "ManifestError", "ManifestMissing", "CorruptShard", "ShardArgumentError",
    # random access by record index (Arrow, ArrayRecord): DataLoader / DistributedSampler / Grain
    "PackedDataset", "NoRandomAccess",
    # writing packed output (atomic, sharded), as the Beam job and the examples do
    "prepare_output_dir", "write_shard", "write_dataset", "write_manifest", "write_rejects", "remove_unlisted",
    "new_run_id", "sha256_file", "record_encoder", "OutputDirError",
    "OutputWriteError", "MANIFEST", "REJECTS",
    # one writer per output folder: the lock a run holds while it writes
    "claim_output", "OutputClaim", "OutputLocked", "OwnershipLost", "LOCK",
    # from a record to a model's inputs
    "attention_mask", "pooling_matrix", "tf_attention_mask", "tf_pooling_matrix", "siglip2_inputs",
    "timm_naflex_inputs",
    # attention inputs for fused kernels: FlashAttention varlen, torch flex_attention
    "cu_seqlens", "flex_block_mask",
]
