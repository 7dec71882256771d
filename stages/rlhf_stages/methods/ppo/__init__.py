"""methods/ppo"""
