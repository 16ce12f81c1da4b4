"""Distillation methods: loss objects over the generic trainer, and the pipelines that chain their stages."""
