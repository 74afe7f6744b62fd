"""Options declared once, the recipes that hold the numbers, the one resolver."""
