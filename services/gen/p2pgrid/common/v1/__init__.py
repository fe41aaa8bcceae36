# Generated from proto/ by scripts/gen_protos.py (make proto). DO NOT EDIT.
