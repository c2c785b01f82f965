def main():
    raise SystemExit("placeholder")
