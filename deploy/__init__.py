"""Deployment helpers: configuration for hosts with several GPUs (deploy.multi_gpu)."""
