"""The packed-record schema and its formats: one definition (schemas.Schema, SCHEMA_VERSION) from which
the TFRecord feature spec, the Arrow/Parquet schema, the writers, the readers and verify() derive.

Heavy frameworks (tensorflow, pyarrow) are imported inside the functions that use them.
"""
from ._io import (MANIFEST, REJECTS, CorruptShard, ManifestError, ManifestMissing, OutputDirError, OutputWriteError,
                  claim_output, iter_shard, prepare_output_dir, read, read_manifest, sha256_file, shard_name, shard_paths, write_dataset,
                  write_manifest, write_rejects, write_shard)
from ._owner import LOCK, OutputClaim, OutputLocked, OwnershipLost
from ._hf import siglip2_inputs
from ._masks import attention_mask, pooling_matrix, tf_attention_mask, tf_pooling_matrix
from ._schema import (BASE_FIELDS, FORMATS, SCHEMA_VERSION, Field, RecordError, Schema, SchemaError,
                      check_consistency, numpy_dtype)
from ._tf import tf_dataset
from ._tfrecord import decode_example
from ._verify import VerificationError, VerifyReport, verify

__all__ = [name for name in dir() if not name.startswith("_")]
