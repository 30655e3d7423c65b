from jobs._common import main

if __name__ == "__main__":
    main("distill")
