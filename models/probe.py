"""`python -m models.probe PATH`: load a GGUF file once with llama.cpp and exit.

Run in a separate process for every newly added model, so that a file that makes llama.cpp
abort() or fail kills this short-lived process instead of the server. Exit 0 means it loaded.
"""

import sys

from llama_cpp import Llama


def main(path: str) -> int:
    llm = Llama(model_path=path, n_ctx=64, n_batch=8, n_threads=1, n_gpu_layers=0, verbose=False)
    llm.tokenize(b"probe")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
