"""fundusflow: a Keras 3 / TensorFlow training pipeline for retinal images."""

import setuptools

# Pinned: the pipeline is tested with exactly these. tensorflow-cpu because GPU
# training runs on the JAX backend (docs/ARCHITECTURE.md, "Backends").
INSTALL_REQUIRES = [
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "tensorboard==2.21.0",  # TF 2.21 no longer pulls it in; the callback needs it
    "gin-config==0.5.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "opencv-python-headless==5.0.0.93",
    "simplejpeg==1.9.0",  # libjpeg-turbo in strict mode: "Corrupt JPEG data" is an error
    "scikit-learn==1.9.1",
    "pandas==3.1.1",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    "tqdm==4.70.1",
]

EXTRAS = {
    # jax: tests check that models/ gives the same numbers on the GPU host's backend.
    # hypothesis: property-based tests of decoding / field detection (tests/test_properties.py).
    # pytest-xdist: `make test` runs the test files on both CI cores (-n 2). The onnx
    # extra too: the ONNX export tests and the OCT / OcuNet chains' ONNX steps run in CI.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "ruff==0.17.6",
             "jax==0.10.2", "jaxlib==0.10.2", "hypothesis==6.170.17",
             "tf2onnx==1.17.0", "onnx==1.23.1", "onnxruntime==1.30.0"],
    "onnx": ["tf2onnx==1.17.0", "onnx==1.23.1", "onnxruntime==1.30.0"],
    "jax": ["jax==0.10.2", "jaxlib==0.10.2"],
}

setuptools.setup(
    name="fundusflow",
    version="0.1.0",
    description="Train, evaluate, explain and serve retinal image models.",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=[
        "input_pipeline", "input_pipeline.*", "models", "models.*",
        "evaluation", "evaluation.*", "training", "training.*", "serving", "serving.*"]),
    py_modules=["train", "evaluate", "export", "predict"],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
