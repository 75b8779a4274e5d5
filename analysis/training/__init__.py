"""Training the embedded default: a tiny LLaVA that reads, trained on the synthetic twins on CPU.

Two stages, as LLaVA itself never trains its vision encoder from scratch inside the LM loss:
A. the vision tower alone, with a dense per-patch objective (which character is drawn in my cell);
B. the LLaVA model with the tower frozen: projector + language model on the twins' questions.
"""
