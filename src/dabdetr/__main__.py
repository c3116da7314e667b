from dabdetr.cli import main

main()
