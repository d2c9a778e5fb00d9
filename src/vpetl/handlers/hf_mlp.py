"""Adapter placement for HF transformers blocks whose MLP is split in two modules. [in progress]"""
