"""Tokenizers, built-in verifiable tasks, packing and the grain input pipeline."""

from m1_jax.data.packing import Document, encode_document, pack_documents, rows_to_batch, split_document
from m1_jax.data.pipeline import make_train_iterator
from m1_jax.data.sources import BuiltinTaskSource, heldout_examples, train_examples
from m1_jax.data.tasks import TASKS, Example, extract_answer, verify
from m1_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
