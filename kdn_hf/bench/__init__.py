"""Benchmarks and the quality harness behind ``kdn bench`` (see ``run.py``)."""

from kdn_hf.bench.run import METHODS, Method, format_table, methods_from, plot, run_bench, write_json
from kdn_hf.bench.workload import SPLITS, RagCase, answer_found, dev_qa, qa_set, rag_cases

__all__ = [
    "METHODS",
    "SPLITS",
    "Method",
    "RagCase",
    "answer_found",
    "dev_qa",
    "format_table",
    "methods_from",
    "plot",
    "qa_set",
    "rag_cases",
    "run_bench",
    "write_json",
]
