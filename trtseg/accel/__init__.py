"""trtseg.accel: turns a trained model into a fast engine, and runs engines behind one small interface.

    engines.py   Engine interface and the PyTorch backend (CUDA with autocast / torch.compile, or CPU)
"""
