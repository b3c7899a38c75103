"""Support shared by the tests and the benchmarks (not installed with the
package; importable from the repository root, where ``make test`` and
``make bench`` run): a scripted OpenAI-compatible server on 127.0.0.1, tiny
random BLIP / CLIP / Stable Diffusion / ViT models built from configs, and
comparisons of atlas tables."""
