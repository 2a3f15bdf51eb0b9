"""triton_models"""
